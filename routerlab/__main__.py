from routerlab.cli import main

main()

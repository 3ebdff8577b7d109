"""python3 -m routerlab.bench [cpu|gpu] ...: the core benchmark without typer or pydantic (a bare GPU machine)."""
from routerlab.bench.core import main

main()

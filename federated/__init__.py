"""Federated expert training with Flower (Message API).

Modules: `config` (the `federated:` section), `partition` (client splits), `aggregate` (the three
strategies, pure torch), `client_app` / `server_app` (the Flower apps), `simulation` (the Ray path
behind `routerlab federate`), `deployment` (a SuperLink and SuperNodes on 127.0.0.1).
Only `client_app`, `server_app`, `simulation` and `deployment` import flwr.
"""

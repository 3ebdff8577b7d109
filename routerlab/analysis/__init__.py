"""Routing analysis: record and replay routing, regret against an oracle, drift and structure, and an
expert-placement simulator. See docs/analysis.md.

    trace.py      record a routing trace on a fixed probe set; read and write it (.npz)
    regret.py     each probe token's loss under each single expert -> regret, rank, the oracle's choice
    structure.py  overlap between traces, router margin, co-activation, domain x expert tables
    placement.py  per-rank load and projected step time of expert placements (round robin, greedy, EPLB)
    figures.py    the PNGs (matplotlib, imported lazily)
    report.py     `routerlab analyze RUN`: all of the above on a finished run
    recorder.py   the trainer option: traces (and regret) at chosen steps of a training run
    cli.py        `routerlab trace` and `routerlab analyze`

Only torch and numpy are imported at module level (matplotlib and rich lazily), so traces can be recorded
on the bare GPU machine.
"""

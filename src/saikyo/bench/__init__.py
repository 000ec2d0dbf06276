"""The cost lab: load generation, sweeps, cost performance, the 2018 plots and a capacity plan.

    load.py       the load generator (seed / closed / open loop) against POST /classify
    stats.py      latency percentiles (nearest rank)
    records.py    one JSON line per measured run (docs/architecture.md, "Benchmark record")
    hardware.py   what machine this is
    cost.py       instance prices (prices.toml) and the cost arithmetic
    localserver.py  a `saikyo serve` subprocess on a free loopback port
    sweep.py      the matrix models x images per request x server settings, resumable
    capacity.py   the highest Poisson rate whose p99 meets a target (bracket, then bisect)
    plot.py       the 2018 figure, accuracy vs images per dollar, throughput-vs-p99 curves
    recommend.py  cheapest configuration meeting a p99 budget at a request rate (and a top-1 floor)
    report.py     one self-contained HTML page
    cli.py        `saikyo bench ...`
"""

"""Benchmarks of rgemma against the official `recurrentgemma.torch`, HF RecurrentGemma
and a HF Gemma transformer baseline; outside the installed package.

    peers.py      the official and HF models on the same weights as an rgemma model
                  (shared with the tests' oracles)
    machine.py    the machine: bandwidth, FLOP/s, memory; memory estimates per point
    adapters.py   each implementation behind one prefill / decode interface
    worker.py     the worker subprocess that measures, and the parent that runs it
    harness.py    options, sections and orchestration
    report.py     rows, tables, plots and RESULTS.md
    run_all.py    the command: python benchmarks/run_all.py --quick
    serve_load.py, gemv_kernels.py   the server under load; the batch-1 GEMV kernels
"""

"""Research experiments built on the package: what the scripts in scripts/ run.

compare_dense     MoE vs FLOP-matched dense baselines at equal steps and wall-clock (scripts/compare_dense.py)
stability_sweep   the ST-MoE stability table (Table 3) at tiny scale (scripts/stability_sweep.py)
benchmark_peers   stmoe vs Hugging Face Switch Transformers on the same weights (scripts/benchmark_peers.py)
router_learning   why routers learn or stay uniform: per-step update sizes and gradient parts (scripts/diagnose_routers.py)
"""

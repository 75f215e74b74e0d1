"""One prepared GPU check: every GPU claim of the project measured in one run (``python -m benchmarks.gpu_check``).

A GPU machine is lent for minutes, bare and without a registry, so the check is ready before it starts: four
parts (parity on the GPU, device decode, throughput, other GPU claims), each run on its own, written to
``benchmarks/results/<gpu-name>/gpu_check.{md,json}``. ``--dry-run`` runs the same parts on the CPU with the
reduced-width model, so the script cannot rot before a GPU shows up. How to run it: ``benchmarks/gpu_check.md``.
"""

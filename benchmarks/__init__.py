"""Benchmarks, kept out of the runtime, exporter and training packages. Each measures its methods
side by side in one run with the one timing helper, `benchmarks.timing`.

    lorasa-bench --quick                       # benchmarks.engine: mixed-agent inference
    python -m benchmarks.export --agents 8     # export timings/sizes, Engine vs onnxruntime `act`
    python -m benchmarks.training --preset halfcheetah_2x3   # training throughput vs random stepping
"""

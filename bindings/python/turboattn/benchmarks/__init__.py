"""The GPU benchmarks (docs/BENCHMARKS.md): `turboattn bench prefill|decode`, or bench/prefill.py and
bench/decode.py in the source tree. Each module has main(argv) and needs PyTorch (prefill: Triton too)."""

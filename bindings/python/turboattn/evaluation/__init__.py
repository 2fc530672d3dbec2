"""Accuracy evaluation on real models and text (docs/ACCURACY.md): `turboattn eval` and `turboattn demo`."""

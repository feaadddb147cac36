"""Benchmarks of pni_fast against the paper-faithful reference, torch.compile and torch.clone.

Run ``python benchmarks/run_all.py`` (or ``--quick`` for a seconds-long smoke run); results land
under ``benchmarks/results/<device>/`` as JSON, Markdown and a plot.
"""

"""Benchmarks. `serve`: online load generator against an OpenAI-compatible server
(`deepserve bench serve`; figures in `serve_report`, arguments in `cli`).
"""

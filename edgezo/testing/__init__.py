"""Test support, shipped with the package so that tests/ and bench/ share it: tiny models and data
(`tiny`), a daemon in a subprocess with its own state directory (`daemon`), and an engine with the
trainer's contract and no model (`synthetic`, the daemon's `--engine synthetic`). The product never
imports it, except the worker when asked for the synthetic engine."""

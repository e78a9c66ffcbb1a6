"""Measuring tools: the HTTP load generator, the offline engine benchmark and their report.

They live apart from ``server/`` and ``runtime/`` because they *use* those packages from the
outside (as a client, or as a driver of an engine); nothing in server/, runtime/ or export/
imports this package. Heavy imports (httpx, matplotlib, numpy) stay inside the modules.
"""

"""Fault tests: real processes (a private redis-server, sim workers, routers, a
gateway) over loopback, killed, stopped and restarted on purpose. The process
helpers (`stack`, `faults`) live in tests/conftest.py, shared with tests/security.
"""

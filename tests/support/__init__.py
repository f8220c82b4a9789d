"""Test harness: echo upstream clients, proxy processes, configs and the differential runner."""

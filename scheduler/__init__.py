"""gpupool's scheduler: tracks hosts and devices, hands out signed leases on (fractions of) GPUs.

capacity.py (capacity model), placement.py (binpack / spread), leases.py + hosts.py (the core), store.py
(SQLite WAL / in-memory), service.py (gRPC servicer), metrics.py, cli.py (`gpupool scheduler`).
"""

"""gpupool client side: the session op stream (session.py), and the scheduler client and torch device built on it."""

"""peftlab's benchmark against HF Trainer + peft (run_bench.py) and its speed levers (levers.py)."""

"""What every benchmark records about the machine, and how it saves its result."""
import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine():
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def save(result, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(result, machine=machine()), f, indent=1)
    print(f"-> {path}")

"""The paper's tables on deepfashion2 (see pml_mutual/reproduce.py and `python benchmarks/deepfashion2.py
--help`)."""

from pml_mutual.reproduce import run

if __name__ == "__main__":
    run("deepfashion2")

"""The paper's tables on cars196 (see pml_mutual/reproduce.py and `python benchmarks/cars196.py --help`)."""

from pml_mutual.reproduce import run

if __name__ == "__main__":
    run("cars196")

"""The paper's tables on cub200 (see pml_mutual/reproduce.py and `python benchmarks/cub200.py --help`)."""

from pml_mutual.reproduce import run

if __name__ == "__main__":
    run("cub200")

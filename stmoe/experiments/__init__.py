"""Research experiments built on the package: what the scripts in scripts/ run."""

"""Training configs that ship inside the package: `tiny_dual` is the embedded default that
`flmjax main` trains (experiments/configs/ holds the others, and re-exports this one)."""

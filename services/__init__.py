"""The seven lmforge services, one package each; they never import each other."""

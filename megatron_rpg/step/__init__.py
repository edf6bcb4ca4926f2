"""One RL step as its stages: collect, advantages, batch, update, reference, and the transaction
that commits a step or puts the run's state back (rl_step.py runs them in order)."""

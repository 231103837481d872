"""Validation: following the swarm's model, verifying miners' answers, scoring, the score book."""

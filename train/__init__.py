"""Runs training: the entry point, loop, schedules, engines, checkpoints, metrics, upcycling."""

"""`lightspeed replay`: discrete-event fleet simulation in virtual time with the production router, scheduler and planner."""

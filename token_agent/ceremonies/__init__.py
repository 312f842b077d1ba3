"""Ceremonies: enrolment and login, one module per method. Each returns structured results
(``token_agent.outcome``) and writes to the store in one transaction."""

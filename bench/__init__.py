"""`python -m bench`: execq against bare Celery on this machine, same workload, one run."""

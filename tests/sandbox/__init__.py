"""Tests of workers.sandbox: real child processes, real cgroups, no mocks."""

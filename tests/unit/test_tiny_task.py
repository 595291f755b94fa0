"""examples/tiny/task.py (the synthetic task of the tiny recipe): its documented properties."""

import doctest

import examples.tiny.task as task


def test_task_doctests():
    result = doctest.testmod(task)
    assert result.attempted > 0 and result.failed == 0

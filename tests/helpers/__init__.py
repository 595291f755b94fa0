"""Test utilities of this repository (not shipped): training, weight and fault helpers, fakes."""

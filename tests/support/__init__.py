"""Test-support code: helpers, tool runners and fixtures shared by the test modules.

Test modules import from here, never from one another; conftest.py holds (or imports) the
fixtures pytest must find.
"""

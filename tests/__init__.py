import pytest

# The shared test modules assert too: rewrite them like test modules, so a failure shows its values.
pytest.register_assert_rewrite("tests.helpers", "tests.secret_scan", "tests.sse_grammar", "tests.responses_grammar")

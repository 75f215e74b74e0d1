"""The package exports the errors a caller catches: every class of ipiqa.errors, ConfigError included."""
from __future__ import annotations

import ipiqa
from ipiqa import errors


def test_every_error_class_is_exported_by_the_package():
    for name in errors.__all__:
        assert name == "MissingDependencyError" or (getattr(ipiqa, name) is getattr(errors, name)
                                                    and name in ipiqa.__all__)
    assert issubclass(ipiqa.ConfigError, ipiqa.IPIQAError)

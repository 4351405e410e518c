"""What every schema shares: unknown keys refused, the name patterns, blank-item checks."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

# A variant's name: also a file name and a store key.
VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


def check_name(value: str) -> str:
    """The one rule for names that become folder and file names (jobs, judges, variants):
    letters, digits and . _ + -, starting with a letter or digit; no `/`, no `..`, no
    spaces, so `<home>/runs/<name>` stays under the home and registers as a variant."""
    if not re.fullmatch(VARIANT_NAME, value) or ".." in value:
        raise ValueError("a name usable as a folder (letters, digits and . _ + -, starting "
                         "with a letter or digit; no spaces, '/' or '..')")
    return value


Name = Annotated[str, AfterValidator(check_name)]
# The persona a job or the console uses when none is named.
DEFAULT_PERSONA = "ayane"
# The judge a job uses when none is named.
DEFAULT_JUDGE = "gpt-4o-mini"


class Strict(BaseModel):
    """Every model forbids unknown keys: a typo in a YAML file is an error, not a silently
    ignored setting."""

    model_config = ConfigDict(extra="forbid", frozen=False)


def no_blank_items(value: list[str]) -> list[str]:
    blank = [i for i, item in enumerate(value) if not item.strip()]
    if blank:
        raise ValueError(f"item [{blank[0]}] is blank; every item needs text")
    return value

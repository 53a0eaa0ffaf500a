"""``data=digits`` and ``teacher=digits``: scikit-learn's handwritten digits as real images
(``data``), and the digits FID (``fid``). See docs/methods/digits.md."""

from core import hookimpl

from .data import DigitsData, DigitsDataConfig, DigitsTeacher, DigitsTeacherConfig


@hookimpl
def register_teachers(register):
    register("digits", DigitsTeacher, config=DigitsTeacherConfig, default_student="unet", default_data="digits")


@hookimpl
def register_datasets(register):
    register("digits", DigitsData, config=DigitsDataConfig, default_teacher="digits")  # data=digits alone

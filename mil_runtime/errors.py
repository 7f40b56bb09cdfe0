"""One exception family for everything the runtime refuses.

Each class carries the process exit code that `mil-infer` (and `mil-export`) return for it, so the
CLI maps an error to one stderr line and a documented code without a table of its own. Messages say
what is wrong *and* what to do.

| code | class                 | meaning                                                        |
|------|-----------------------|----------------------------------------------------------------|
| 1    | MilkitError           | anything else the toolkit refuses                              |
| 2    | (click usage error)   | bad command-line options                                       |
| 3    | InputNotFoundError    | an input path does not exist                                   |
| 4    | ModelFormatError      | the .onnx is unreadable, truncated, or not a milkit model      |
| 5    | ContractMismatchError | input and model disagree (feature dim, missing input, encoder) |
| 6    | InvalidInputError     | bad values in the input (NaN/Inf features, empty bag)          |
| 7    | OutputError           | the output folder cannot be written                            |
| 8    | SlideReadError        | OpenSlide cannot open or read the slide                        |
| 9    | MppUnknownError       | no trustworthy microns-per-pixel and no --mpp                  |
| 10   | NoTissueError         | no tissue tile survives detection (or slide smaller than a tile)|
| 11   | DeviceError           | --device cuda asked for, CUDA provider unavailable             |
| 12   | OutputBusyError       | another live mil-infer is writing the same outputs (<stem>.lock)|
"""

from __future__ import annotations


class MilkitError(Exception):
    """Base of every error the toolkit raises on purpose; `exit_code` is the CLI's return code."""

    exit_code = 1


class InputNotFoundError(MilkitError):
    exit_code = 3


class ModelFormatError(MilkitError):
    exit_code = 4


class ContractMismatchError(MilkitError):
    exit_code = 5


class InvalidInputError(MilkitError):
    exit_code = 6


class OutputError(MilkitError):
    exit_code = 7


class SlideReadError(MilkitError):
    exit_code = 8


class MppUnknownError(MilkitError):
    exit_code = 9


class NoTissueError(MilkitError):
    exit_code = 10


class DeviceError(MilkitError):
    exit_code = 11


class OutputBusyError(OutputError):
    """A live writer holds `<stem>.lock` (mil_runtime.claims): the second writer fails, it does not wait."""

    exit_code = 12


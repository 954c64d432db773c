"""Qt-free parts of the DEQRegistration Slicer module.

Everything here works on MRML nodes only (no ``slicer.app``, no Qt), so it
runs and is tested on the ``slicer-core`` wheel as well as inside Slicer. The
module file ``DEQRegistration.py`` keeps only the GUI and the Slicer base
classes. Nothing heavy (torch, the registration library) is imported here at
module load; the functions that need it import it when called.

* ``parameters``: the parameter node and its one mapping to the library's settings;
* ``logic``: checks, inputs, output nodes, ``RegistrationLogic``;
* ``run``: one registration running in a worker thread, written into the scene by ``poll()``;
* ``layout``: the live layout (overlay, folding map, chart);
* ``mrml``: conversions between nodes and library arrays;
* ``dependencies``: torch and packages inside Slicer;
* ``sampledata``: the one-click sample pair;
* ``testing``: synthetic volumes and a layout-manager stand-in for the tests.
"""
from .parameters import PARAMETERS, NODE_REFERENCES, ParameterNode  # noqa: F401
from .logic import RegistrationLogic  # noqa: F401
from .run import RegistrationOutputs, RegistrationRun  # noqa: F401

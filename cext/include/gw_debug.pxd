cdef extern from "gw_debug.h":
    const int GW_DEBUG

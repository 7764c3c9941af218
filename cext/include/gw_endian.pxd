from libc.stdint cimport uint16_t, uint32_t

cdef extern from "gw_endian.h":
    uint32_t gw_load_be32(const unsigned char *p) nogil
    uint16_t gw_load_be16(const unsigned char *p) nogil
    void gw_store_be32(unsigned char *p, uint32_t v) nogil
    void gw_store_be16(unsigned char *p, uint16_t v) nogil

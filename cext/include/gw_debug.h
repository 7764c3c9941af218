/* GW_DEBUG switches invariant checks on in a debug build (setup.py --debug-build). */
#ifndef GW_DEBUG
#define GW_DEBUG 0
#endif

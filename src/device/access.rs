//! Device access: info, regions, IRQs, reset, bus mastering.

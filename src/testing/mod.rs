//! Hooks for brook's own crash tests, kept at the bottom of the module layers
//! so that every layer can reach them.

pub mod faults;

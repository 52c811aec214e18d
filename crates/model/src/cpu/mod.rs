//! Kernels of the CPU engine: the matrix product over weights packed at load ([`gemm`]), decode
//! attention over the paged cache ([`attention`]) and its vector primitives ([`vector`]), hand vectorised for AVX-512, each with a portable
//! twin of the same arithmetic so that every CPU computes the same bits. The only place in the
//! crate where `unsafe` is allowed, each use with the reason it is sound.

#[allow(unsafe_code)]
pub mod attention;
#[allow(unsafe_code)]
pub mod gemm;
#[allow(unsafe_code)]
pub mod vector;

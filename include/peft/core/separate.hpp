#pragma once
// Separate compilation of the heaviest non-template functions, for the project's own test build.
//
// For every user of the library nothing changes: PEFT_SEPARATE_INLINE is `inline` and each header
// defines its functions (header-only). The test build defines PEFT_SEPARATE_COMPILATION in every
// test TU: a function declared PEFT_SEPARATE_INLINE is then an ordinary declaration there, its body
// (and every helper only that body uses, such as the safetensors header parser or the regex
// compiler) is skipped by the preprocessor (`#if PEFT_SEPARATE_BODIES`), and
// tests/support/separate_bodies.cpp, which also defines PEFT_SEPARATE_SOURCE, compiles the bodies
// once as plain (non-inline) functions.
//
// Hiding the body is the point. GCC inlines a gnu_inline ("extern inline") body into its callers
// whatever its size, so marking bodies gnu_inline made the test TUs larger, and at -O1 drove the
// regex parser's mutually recursive functions into an inlining and points-to blow-up (measured in
// docs/CONTRIBUTING.md).
//
// Only entry points whose bodies pull in much code belong here (file parsers, config readers,
// compilers), or message-building validators that most test TUs would otherwise compile
// (SequenceLayout::validate was in 13 of the test build's objects). Such a function keeps a
// PEFT_SEPARATE_INLINE declaration (with its documentation and default arguments) outside the
// `#if PEFT_SEPARATE_BODIES` block and its definition inside; nothing outside a block may use what
// the block defines.
#if defined(PEFT_SEPARATE_COMPILATION)
#define PEFT_SEPARATE_INLINE
#if defined(PEFT_SEPARATE_SOURCE)
#define PEFT_SEPARATE_BODIES 1
#else
#define PEFT_SEPARATE_BODIES 0
#endif
#else
#define PEFT_SEPARATE_INLINE inline
#define PEFT_SEPARATE_BODIES 1
#endif

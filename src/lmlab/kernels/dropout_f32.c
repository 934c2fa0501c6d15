/* Dropout on CPU fp32 tensors: the keep-mask drawn and applied in one pass, and its backward.
 *
 * Why: torch's CPU dropout draws its random numbers from one sequential Mersenne Twister (its
 * `rand_like` costs ~4 ns an element, single-threaded), then compares and multiplies in two
 * more passes — ~9 ms for the 1.2 M activations of one T5 feed-forward layer in a batch of 64
 * pairs, 10-12% of a small translation model's training step on 2 cores. Here each element's
 * random bits are a hash of (seed, its index) — counter-based, like the Philox generator CUDA
 * uses — so the elements are independent of each other, the loop vectorises and splits over
 * threads, and the mask is the same whatever the number of threads. The seed is drawn from
 * torch's generator by the caller (kernels/dropout.py), so `torch.manual_seed` and a
 * checkpoint's RNG state decide the masks as they decide torch's.
 *
 * The hash is two rounds of Wellons' lowbias32 (xor-shift-multiply; a bijection of 32 bits
 * with low avalanche bias) keyed by the two halves of the seed; an element is kept when its 32
 * bits are >= p * 2^32, so the drop probability is p to within 2^-32. The mask is kept as one
 * bit per element (bit i%8 of byte i/8) for the backward pass: 1/32 of a float mask's memory.
 * Eight lanes at a time with AVX2 (the AVX-512 build runs the same code).
 */
#include <immintrin.h>
#include <stdint.h>

#define BLOCK 16384  /* elements per OpenMP work item (a multiple of 8: whole mask bytes) */

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline __m256i lowbias32x8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7feb352dU));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bU));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* The random bits of element `index` (the scalar twin of the vector loop's formula). The
 * index's high half goes into the second round's key, so tensors past 2^32 elements do not
 * repeat the first 2^32's mask. */
static inline uint32_t element_bits(int64_t index, uint32_t key0, uint32_t key1) {
    const uint32_t high = key1 ^ lowbias32((uint32_t)(index >> 32));
    return lowbias32(lowbias32((uint32_t)index ^ key0) + high);
}

/* out = x * keep * scale with keep[i] = bits(seed, i) >= threshold; `keep` gets one bit per
 * element, (n + 7) / 8 bytes. */
void lmlab_dropout_f32(const float *x, float *out, uint8_t *keep, int64_t n, uint64_t seed,
                       uint32_t threshold, float scale, int threads) {
    const uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static) if (blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t start = b * BLOCK, end = start + BLOCK < n ? start + BLOCK : n;
        /* A block never straddles a multiple of 2^32 (BLOCK divides it): one high half. */
        const __m256i high = _mm256_set1_epi32((int)(key1 ^ lowbias32((uint32_t)(start >> 32))));
        const __m256i k0 = _mm256_set1_epi32((int)key0);
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        /* unsigned bits >= threshold, as a signed comparison of both with the top bit flipped */
        const __m256i flip = _mm256_set1_epi32((int)0x80000000U);
        const __m256i limit = _mm256_set1_epi32((int)(threshold ^ 0x80000000U));
        const __m256 factor = _mm256_set1_ps(scale);
        int64_t i = start;
        for (; i + 8 <= end; i += 8) {
            const __m256i index = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)i), lanes);
            const __m256i bits = lowbias32x8(
                _mm256_add_epi32(lowbias32x8(_mm256_xor_si256(index, k0)), high));
            const __m256i dropped = _mm256_cmpgt_epi32(limit, _mm256_xor_si256(bits, flip));
            const __m256 kept = _mm256_castsi256_ps(
                _mm256_xor_si256(dropped, _mm256_set1_epi32(-1)));
            _mm256_storeu_ps(out + i, _mm256_and_ps(kept, _mm256_mul_ps(_mm256_loadu_ps(x + i),
                                                                        factor)));
            keep[i / 8] = (uint8_t)_mm256_movemask_ps(kept);
        }
        if (i < end) {  /* the tensor's last, partial byte */
            uint8_t byte = 0;
            for (int lane = 0; i + lane < end; lane++) {
                const uint32_t kept = element_bits(i + lane, key0, key1) >= threshold;
                byte |= (uint8_t)(kept << lane);
                out[i + lane] = kept ? x[i + lane] * scale : 0.0f;
            }
            keep[i / 8] = byte;
        }
    }
}

/* grad_x = grad_out * keep * scale, `keep` as lmlab_dropout_f32 wrote it. */
void lmlab_dropout_backward_f32(const float *grad, const uint8_t *keep, float *out, int64_t n,
                                float scale, int threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static) if (blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t start = b * BLOCK, end = start + BLOCK < n ? start + BLOCK : n;
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256 factor = _mm256_set1_ps(scale);
        int64_t i = start;
        for (; i + 8 <= end; i += 8) {
            const __m256i byte = _mm256_set1_epi32(keep[i / 8]);
            const __m256 kept = _mm256_castsi256_ps(
                _mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), bit));
            _mm256_storeu_ps(out + i, _mm256_and_ps(kept, _mm256_mul_ps(
                _mm256_loadu_ps(grad + i), factor)));
        }
        for (; i < end; i++)
            out[i] = (keep[i / 8] >> (i % 8)) & 1 ? grad[i] * scale : 0.0f;
    }
}

//! The paged KV cache: keys and values of every layer live in fixed-size blocks of a shared pool; a
//! sequence owns a table of blocks reserved in full when it joins (its length is known), so a running
//! sequence never runs out of memory. Block accounting here is the worker's check of the scheduler's.

use crate::ModelError;

/// Hands out block ids from a fixed pool.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    total: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(total: usize) -> Self {
        // Reversed so that low ids go out first: easier to read in logs and tests.
        BlockAllocator {
            total,
            free: (0..total as u32).rev().collect(),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, ModelError> {
        if n > self.free.len() {
            return Err(ModelError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
        debug_assert!(self.free.len() <= self.total);
    }
}

/// Blocks needed to hold `tokens` positions.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Key and value storage of every layer, addressed by (block, slot).
#[derive(Debug)]
pub struct PagedKvCache {
    block_size: usize,
    d_model: usize,
    /// Per layer: keys then values, each `blocks * block_size * d_model` floats.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    pub allocator: BlockAllocator,
}

impl PagedKvCache {
    pub fn new(n_layers: usize, blocks: usize, block_size: usize, d_model: usize) -> Self {
        // vec![0.0; n] maps zeroed pages lazily: untouched blocks cost no memory.
        let per_layer = blocks * block_size * d_model;
        PagedKvCache {
            block_size,
            d_model,
            keys: (0..n_layers).map(|_| vec![0.0; per_layer]).collect(),
            values: (0..n_layers).map(|_| vec![0.0; per_layer]).collect(),
            allocator: BlockAllocator::new(blocks),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Floats per position (the model width).
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Offset of position `pos` of a sequence with block table `table`.
    #[inline]
    pub fn offset(&self, table: &[u32], pos: usize) -> usize {
        (table[pos / self.block_size] as usize * self.block_size + pos % self.block_size)
            * self.d_model
    }

    /// Stores the key and value of one position.
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, key: &[f32], value: &[f32]) {
        let at = self.offset(table, pos);
        self.keys[layer][at..at + self.d_model].copy_from_slice(key);
        self.values[layer][at..at + self.d_model].copy_from_slice(value);
    }

    /// Keys and values of one layer, for reading.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the order of allocations and releases, no block is handed out twice and none is lost.
        #[test]
        fn allocator_never_double_books(ops in proptest::collection::vec((0usize..6, any::<bool>()), 1..60)) {
            let mut a = BlockAllocator::new(16);
            let mut held: Vec<Vec<u32>> = Vec::new();
            for (n, release) in ops {
                if release && !held.is_empty() {
                    a.release(held.remove(0));
                } else if let Ok(b) = a.allocate(n) {
                    prop_assert_eq!(b.len(), n);
                    held.push(b);
                } else {
                    prop_assert!(n > a.free());
                }
                let mut all: Vec<u32> = held.iter().flatten().copied().collect();
                let count = all.len();
                all.sort_unstable();
                all.dedup();
                prop_assert_eq!(all.len(), count);
                prop_assert_eq!(count + a.free(), 16);
            }
        }
    }

    #[test]
    fn positions_map_into_their_blocks() {
        let mut cache = PagedKvCache::new(1, 4, 2, 3);
        let table = vec![3, 1];
        cache.write(0, &table, 2, &[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]);
        let (k, v) = cache.layer(0);
        // Position 2 is slot 0 of the table's second block, block 1.
        assert_eq!(&k[6..9], &[1.0, 2.0, 3.0]);
        assert_eq!(&v[6..9], &[4.0, 5.0, 6.0]);
        assert_eq!(cache.offset(&table, 1), (3 * 2 + 1) * 3);
        assert_eq!(blocks_for(5, 2), 3);
    }
}

/**
 * The cache device's in-memory index: which (space, block) each slot of the
 * data file holds, the free slots, and the eviction order. Pure and
 * synchronous; the device (cache-device.ts) adds the I/O and the rules about
 * when a slot may be reused. Every operation is O(1) except the bulk ones
 * named as such (dropSpace, construction).
 *
 * Per-slot state lives in typed arrays (about 30 bytes a slot) so that a
 * cache of millions of slots costs no per-slot objects.
 */

/** Slot states. */
export const SlotState = {
  /** Free, and no durable journal record maps it: may be written. */
  FREE: 0,
  /** Allocated to a put whose data write is in flight; not in the index yet. */
  WRITING: 1,
  /** Maps a key (its put record may not be durable yet). */
  LIVE: 2,
  /** Dropped from the index, but the record saying so is not durable yet: must not be written. */
  RETIRED: 3,
} as const;

/** Per-slot flag bits. */
export const SlotFlag = {
  BOOT: 1,
  /** Loaded from a journal that had damage in its middle: check the data checksum before serving. */
  UNVERIFIED: 2,
} as const;

/** A doubly-linked list threaded through the index's prev/next arrays; head is least recent. */
export interface SlotList {
  head: number;
  tail: number;
  size: number;
}

/** One cache space: the identity of the image sub-chain that determines its blocks' bytes. */
export interface Space {
  readonly id: number;
  readonly hex: string;
  /** block index -> slot */
  readonly blocks: Map<number, number>;
  /** This space's boot blocks, least recently used first. */
  readonly boot: SlotList;
  lastBootedAt: number | undefined;
  /** Links in the boot order (spaces holding boot blocks, least recently booted first). */
  orderPrev: Space | undefined;
  orderNext: Space | undefined;
  inOrder: boolean;
  /** Bumped by invalidation: a put that started before it must not land. */
  epoch: number;
  /** Puts in flight per block, so that two puts of one key never run together. */
  readonly writers: Map<number, Promise<void>>;
}

const NIL = -1;

function newList(): SlotList {
  return { head: NIL, tail: NIL, size: 0 };
}

export class SlotIndex {
  readonly state: Uint8Array;
  readonly flags: Uint8Array;
  readonly spaceOf: Uint32Array;
  readonly blockOf: Float64Array;
  readonly crcOf: Uint32Array;
  /** Bumped whenever a slot is allocated: a read that saw another generation read someone else's bytes. */
  readonly generation: Uint32Array;
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  /** 'other' blocks of every space, least recently used first. */
  readonly other: SlotList = newList();
  private orderHead: Space | undefined;
  private orderTail: Space | undefined;
  readonly spaces = new Map<string, Space>();
  /** Indexed by space id; ids from a snapshot or journal may leave holes. */
  readonly spacesById: (Space | undefined)[] = [];
  /** Free slots as a stack (lowest slot on top after construction). */
  private readonly freeStack: Uint32Array;
  private freeTop = 0;
  mapped = 0;
  bootMapped = 0;
  retired = 0;

  constructor(readonly slotCount: number) {
    this.state = new Uint8Array(slotCount);
    this.flags = new Uint8Array(slotCount);
    this.spaceOf = new Uint32Array(slotCount);
    this.blockOf = new Float64Array(slotCount);
    this.crcOf = new Uint32Array(slotCount);
    this.generation = new Uint32Array(slotCount);
    this.prev = new Int32Array(slotCount).fill(NIL);
    this.next = new Int32Array(slotCount).fill(NIL);
    this.freeStack = new Uint32Array(slotCount);
  }

  // --- spaces ---

  /** The space with this identity, created (with the next id) when new. */
  space(hex: string, id?: number): Space {
    let sp = this.spaces.get(hex);
    if (sp) return sp;
    sp = {
      id: id ?? this.spacesById.length,
      hex,
      blocks: new Map(),
      boot: newList(),
      lastBootedAt: undefined,
      orderPrev: undefined,
      orderNext: undefined,
      inOrder: false,
      epoch: 0,
      writers: new Map(),
    };
    this.spaces.set(hex, sp);
    this.spacesById[sp.id] = sp;
    return sp;
  }

  /** An image of this space booted at `time`: its boot blocks become the last to go. */
  markBooted(sp: Space, time: number): void {
    sp.lastBootedAt = time;
    if (sp.inOrder) {
      this.orderUnlink(sp);
      this.orderAppend(sp);
    }
  }

  /** Spaces holding boot blocks, least recently booted first. */
  *bootOrder(): IterableIterator<Space> {
    for (let sp = this.orderHead; sp; sp = sp.orderNext) yield sp;
  }

  /** Rebuilds the boot order from a snapshot (spaces listed least recently booted first). */
  setBootOrder(order: Space[]): void {
    for (const sp of [...this.bootOrder()]) this.orderUnlink(sp);
    for (const sp of order) if (sp.boot.size > 0 && !sp.inOrder) this.orderAppend(sp);
    for (const sp of this.spacesById) if (sp && sp.boot.size > 0 && !sp.inOrder) this.orderAppend(sp);
  }

  private orderAppend(sp: Space): void {
    sp.orderPrev = this.orderTail;
    sp.orderNext = undefined;
    if (this.orderTail) this.orderTail.orderNext = sp;
    else this.orderHead = sp;
    this.orderTail = sp;
    sp.inOrder = true;
  }

  private orderUnlink(sp: Space): void {
    if (sp.orderPrev) sp.orderPrev.orderNext = sp.orderNext;
    else this.orderHead = sp.orderNext;
    if (sp.orderNext) sp.orderNext.orderPrev = sp.orderPrev;
    else this.orderTail = sp.orderPrev;
    sp.orderPrev = sp.orderNext = undefined;
    sp.inOrder = false;
  }

  // --- lookups ---

  /** The slot holding (space, block), or -1. */
  lookup(hex: string, block: number): number {
    const slot = this.spaces.get(hex)?.blocks.get(block);
    return slot === undefined ? NIL : slot;
  }

  spaceOfSlot(slot: number): Space {
    return this.spacesById[this.spaceOf[slot]]!;
  }

  // --- mapping ---

  /**
   * Maps (sp, block) to `slot` as the most recently used block of its list.
   * The slot must not be mapped, and the key must not be mapped elsewhere.
   */
  attach(slot: number, sp: Space, block: number, boot: boolean, crc: number, flags = 0): void {
    this.spaceOf[slot] = sp.id;
    this.blockOf[slot] = block;
    this.crcOf[slot] = crc;
    this.flags[slot] = (boot ? SlotFlag.BOOT : 0) | (flags & SlotFlag.UNVERIFIED);
    this.state[slot] = SlotState.LIVE;
    sp.blocks.set(block, slot);
    this.mapped++;
    if (boot) {
      // A space gaining boot blocks is booting now (the prefetcher streams its segment).
      if (sp.boot.size === 0 && !sp.inOrder) this.orderAppend(sp);
      this.listAppend(sp.boot, slot);
      this.bootMapped++;
    } else {
      this.listAppend(this.other, slot);
    }
  }

  /** Removes a mapped slot from the index; its state is left to the caller. */
  detach(slot: number): void {
    const sp = this.spaceOfSlot(slot);
    sp.blocks.delete(this.blockOf[slot]);
    this.mapped--;
    if (this.flags[slot] & SlotFlag.BOOT) {
      this.listUnlink(sp.boot, slot);
      this.bootMapped--;
      if (sp.boot.size === 0 && sp.inOrder) this.orderUnlink(sp);
    } else {
      this.listUnlink(this.other, slot);
    }
  }

  /** A mapped 'other' block turns out to be a boot block too. */
  promoteToBoot(slot: number): void {
    if (this.flags[slot] & SlotFlag.BOOT) return;
    const sp = this.spaceOfSlot(slot);
    this.listUnlink(this.other, slot);
    this.flags[slot] |= SlotFlag.BOOT;
    if (sp.boot.size === 0 && !sp.inOrder) this.orderAppend(sp);
    this.listAppend(sp.boot, slot);
    this.bootMapped++;
  }

  /** A read of a mapped slot: it becomes the most recently used of its list. */
  touch(slot: number): void {
    const list = this.flags[slot] & SlotFlag.BOOT ? this.spaceOfSlot(slot).boot : this.other;
    if (list.tail === slot) return;
    this.listUnlink(list, slot);
    this.listAppend(list, slot);
  }

  /**
   * The slot to evict next: the least recently used 'other' block, else the
   * least recently used boot block of the least recently booted space; -1
   * when nothing is mapped.
   */
  victim(): number {
    if (this.other.size > 0) return this.other.head;
    return this.orderHead ? this.orderHead.boot.head : NIL;
  }

  /** The slot after `slot` in its list (towards the most recently used), or -1. */
  nextSlot(slot: number): number {
    return this.next[slot];
  }

  // --- free slots ---

  get freeCount(): number {
    return this.freeTop;
  }

  pushFree(slot: number): void {
    this.state[slot] = SlotState.FREE;
    this.freeStack[this.freeTop++] = slot;
  }

  /** A free slot, now WRITING with a new generation; -1 when none is free. */
  popFree(): number {
    if (this.freeTop === 0) return NIL;
    const slot = this.freeStack[--this.freeTop];
    this.state[slot] = SlotState.WRITING;
    this.generation[slot] = (this.generation[slot] + 1) >>> 0;
    return slot;
  }

  /** Takes the free slots at or past `limit` off the free list (the cache shrank); the others keep their order. */
  dropFreeFrom(limit: number): void {
    let kept = 0;
    for (let i = 0; i < this.freeTop; i++) {
      const slot = this.freeStack[i];
      if (slot < limit) this.freeStack[kept++] = slot;
    }
    this.freeTop = kept;
  }

  /** After loading: every slot below `usable` that is not mapped is free (lowest slot handed out first). */
  rebuildFreeList(usable: number): void {
    this.freeTop = 0;
    for (let slot = usable - 1; slot >= 0; slot--) {
      if (this.state[slot] !== SlotState.LIVE) this.pushFree(slot);
    }
  }

  // --- list primitives ---

  private listAppend(list: SlotList, slot: number): void {
    this.prev[slot] = list.tail;
    this.next[slot] = NIL;
    if (list.tail !== NIL) this.next[list.tail] = slot;
    else list.head = slot;
    list.tail = slot;
    list.size++;
  }

  private listUnlink(list: SlotList, slot: number): void {
    const p = this.prev[slot];
    const n = this.next[slot];
    if (p !== NIL) this.next[p] = n;
    else list.head = n;
    if (n !== NIL) this.prev[n] = p;
    else list.tail = p;
    this.prev[slot] = this.next[slot] = NIL;
    list.size--;
  }
}

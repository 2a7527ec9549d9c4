import Foundation

// CLIP's byte-level BPE tokenizer, matching transformers' CLIPTokenizer (5.x, the `tokenizers` pipeline;
// fixtures from reference/make_tokenizer_fixtures.py) id for id:
//   1. the special tokens <|startoftext|> and <|endoftext|> are split out of the raw text (case-sensitive,
//      before any normalisation) and become their ids;
//   2. each segment between them: NFC, runs of White_Space → one space, lower-case scalar by scalar
//      (no final-sigma rule: "Σ" → "σ" everywhere);
//   3. pre-tokenisation `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`,
//      matches kept, everything else (whitespace) dropped; then GPT-2's byte-level split, which on these
//      pieces changes only the special strings, e.g. a lower-cased "<|ENDOFTEXT|>" → "<|" "endoftext" "|>";
//   4. UTF-8 bytes → the printable stand-ins of `bytes_to_unicode`, "</w>" appended to the last one;
//   5. merges by rank (lowest first, all occurrences left to right), symbols → ids;
//   6. BOS + ids + EOS; truncation keeps BOS, the first contextLength − 2 ids and EOS.
// OpenAI's/open_clip's tokenizer gives the same ids except where it cleans differently: it runs
// ftfy.fix_text and html.unescape twice ("&amp;" → "&", mojibake repaired, "ﬁ" → "fi", fullwidth → ASCII),
// splits whitespace with Python's str.split (also U+001C–U+001F, which are not White_Space), lower-cases
// with str.lower (final sigma), and does not treat "<|endoftext|>" in the text as special.

/// A CLIP tokenizer loaded from a Hugging Face folder's `vocab.json` and `merges.txt`.
/// Immutable apart from an internal, locked cache of word → ids; safe to share between threads.
public final class CLIPTokenizer: @unchecked Sendable {
    public static let startOfText = "<|startoftext|>"
    public static let endOfText = "<|endoftext|>"

    /// Id of `<|startoftext|>` (49406 in OpenAI's vocabulary).
    public let bosID: Int
    /// Id of `<|endoftext|>` (49407).
    public let eosID: Int
    /// Token → id, as in vocab.json.
    public let vocabulary: [String: Int]

    /// Byte b → id of its symbol, and of its symbol + "</w>" (the last symbol of a word).
    private let byteIDs: [Int32]
    private let byteEndIDs: [Int32]
    /// (left id << 32 | right id) → (rank, merged id).
    private let merges: [UInt64: (rank: Int32, merged: Int32)]

    private let cacheLock = NSLock()
    private var cache: [[UInt8]: [Int32]] = [:]
    private static let cacheLimit = 100_000

    /// Reads `vocab.json` and `merges.txt` from `folder`.
    public convenience init(folder: URL) throws {
        let vocabURL = folder.appendingPathComponent("vocab.json")
        let mergesURL = folder.appendingPathComponent("merges.txt")
        let json = try readJSONObject(vocabURL)
        var vocabulary: [String: Int] = [:]
        vocabulary.reserveCapacity(json.count)
        for (token, value) in json {
            guard let number = value as? NSNumber, let id = Int(exactly: number.doubleValue), id >= 0 else {
                throw CheckpointError.badConfig(file: vocabURL.path, reason: "id of '\(token)' is not a non-negative integer")
            }
            vocabulary[token] = id
        }
        guard FileManager.default.fileExists(atPath: mergesURL.path) else { throw CheckpointError.missingFile(mergesURL.path) }
        let text: String
        do {
            text = try String(contentsOf: mergesURL, encoding: .utf8)
        } catch {
            throw CheckpointError.unreadable(file: mergesURL.path, reason: "not UTF-8 text")
        }
        var pairs: [(String, String)] = []
        for (index, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            if index == 0 && line.hasPrefix("#version") { continue }
            if line.isEmpty { continue }
            let parts = line.split(separator: " ", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                throw CheckpointError.badConfig(file: mergesURL.path, reason: "line \(index + 1) is not two tokens separated by a space")
            }
            pairs.append((String(parts[0]), String(parts[1])))
        }
        try self.init(vocabulary: vocabulary, merges: pairs, source: folder.path)
    }

    /// From a vocabulary and merges in rank order (first = applied first). `source` names them in errors.
    public init(vocabulary: [String: Int], merges pairs: [(String, String)], source: String = "tokenizer") throws {
        func bad(_ reason: String) -> CheckpointError { .badConfig(file: source, reason: reason) }
        guard let bos = vocabulary[Self.startOfText] else { throw bad("vocabulary has no \(Self.startOfText)") }
        guard let eos = vocabulary[Self.endOfText] else { throw bad("vocabulary has no \(Self.endOfText)") }
        guard vocabulary.values.allSatisfy({ $0 < Int(Int32.max) }) else { throw bad("vocabulary ids exceed 2^31") }
        var byteIDs = [Int32](repeating: 0, count: 256)
        var byteEndIDs = [Int32](repeating: 0, count: 256)
        for byte in 0..<256 {
            let symbol = String(byteSymbols[byte])
            guard let id = vocabulary[symbol], let endID = vocabulary[symbol + "</w>"] else {
                throw bad("vocabulary lacks the byte symbol '\(symbol)' (byte \(byte)) or '\(symbol)</w>'")
            }
            byteIDs[byte] = Int32(id)
            byteEndIDs[byte] = Int32(endID)
        }
        var merges: [UInt64: (rank: Int32, merged: Int32)] = [:]
        merges.reserveCapacity(pairs.count)
        for (rank, (left, right)) in pairs.enumerated() {
            guard let l = vocabulary[left], let r = vocabulary[right], let m = vocabulary[left + right] else {
                throw bad("merge \(rank + 1) '\(left) \(right)' uses a token missing from the vocabulary")
            }
            let key = UInt64(l) << 32 | UInt64(r)
            if merges[key] == nil { merges[key] = (Int32(rank), Int32(m)) }
        }
        self.vocabulary = vocabulary
        self.bosID = bos
        self.eosID = eos
        self.byteIDs = byteIDs
        self.byteEndIDs = byteEndIDs
        self.merges = merges
    }

    /// Throws unless every id this tokenizer can produce is a row of the model's token embedding
    /// (a vocab.json larger than config.json's `vocab_size` would otherwise reach the embedding's
    /// bounds precondition and abort the process). `source` names the folder in the error.
    public func checkFits(_ text: CLIPTextConfig, source: String) throws {
        let largest = vocabulary.values.max() ?? 0
        guard largest < text.vocabSize else {
            throw CheckpointError.badConfig(
                file: source + "/vocab.json",
                reason: "token id \(largest) is outside config.json's text_config.vocab_size \(text.vocabSize); vocab.json and config.json do not belong to the same model")
        }
    }

    /// BOS + the text's ids + EOS. With a `contextLength`, at most that many ids: BOS, the first
    /// contextLength − 2 ids of the text, EOS (what transformers gives with truncation=True,
    /// max_length=contextLength, and open_clip before padding). No padding.
    public func encode(_ text: String, contextLength: Int? = 77) -> [Int] {
        var ids = [bosID]
        for segment in splitSpecialTokens(text) {
            switch segment {
            case .special(let id):
                ids.append(id)
            case .text(let scalars):
                for piece in preTokenize(normalize(scalars)) {
                    ids.append(contentsOf: bpe(piece).lazy.map { Int($0) })
                }
            }
        }
        if let contextLength {
            precondition(contextLength >= 2, "context length \(contextLength) leaves no room for BOS and EOS")
            if ids.count + 1 > contextLength { ids.removeSubrange((contextLength - 1)...) }
        }
        ids.append(eosID)
        return ids
    }

    // MARK: steps

    enum Segment {
        case special(Int)
        case text([Unicode.Scalar])
    }

    /// Step 1: the literal special tokens, matched on the raw text.
    func splitSpecialTokens(_ text: String) -> [Segment] {
        let scalars = Array(text.unicodeScalars)
        var segments: [Segment] = []
        var start = 0
        var i = 0
        while i < scalars.count {
            if scalars[i] == "<" {
                if let (length, id) = matchSpecial(scalars, at: i) {
                    if start < i { segments.append(.text(Array(scalars[start..<i]))) }
                    segments.append(.special(id))
                    i += length
                    start = i
                    continue
                }
            }
            i += 1
        }
        if start < scalars.count { segments.append(.text(Array(scalars[start...]))) }
        return segments
    }

    private func matchSpecial(_ scalars: [Unicode.Scalar], at i: Int) -> (Int, Int)? {
        for (token, id) in [(specialStart, bosID), (specialEnd, eosID)] where hasPrefix(scalars, token, at: i) {
            return (token.count, id)
        }
        return nil
    }

    /// Step 2: NFC, whitespace runs → " ", per-scalar lower case.
    func normalize(_ scalars: [Unicode.Scalar]) -> [Unicode.Scalar] {
        // Below U+0300 every scalar is NFC-stable and nothing composes with it (the first combining
        // mark is U+0300), so the common case skips Foundation's normaliser.
        var nfc = scalars
        if scalars.contains(where: { $0.value >= 0x300 }) {
            var text = String.UnicodeScalarView()
            text.append(contentsOf: scalars)
            nfc = Array(String(text).precomposedStringWithCanonicalMapping.unicodeScalars)
        }
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(nfc.count)
        var previousWasSpace = false
        for scalar in nfc {
            if scalar.value < 0x80 {
                let v = scalar.value
                if v == 0x20 || (v >= 0x09 && v <= 0x0D) {
                    if !previousWasSpace { out.append(" ") }
                    previousWasSpace = true
                } else {
                    out.append(v >= 0x41 && v <= 0x5A ? Unicode.Scalar(v + 0x20)! : scalar)
                    previousWasSpace = false
                }
                continue
            }
            if scalar.properties.isWhitespace {
                if !previousWasSpace { out.append(" ") }
                previousWasSpace = true
                continue
            }
            previousWasSpace = false
            if scalar.properties.changesWhenLowercased {
                out.append(contentsOf: scalar.properties.lowercaseMapping.unicodeScalars)
            } else {
                out.append(scalar)
            }
        }
        return out
    }

    /// Step 3: the pre-tokenisation pattern, by hand, alternatives tried in the pattern's order.
    func preTokenize(_ s: [Unicode.Scalar]) -> [ArraySlice<Unicode.Scalar>] {
        var pieces: [ArraySlice<Unicode.Scalar>] = []
        var i = 0
        while i < s.count {
            let c = s[i]
            if c == "<", let token = [specialStart, specialEnd].first(where: { hasPrefix(s, $0, at: i) }) {
                // GPT-2's byte-level split then cuts it into "<|", the name, "|>".
                pieces.append(s[i ..< i + 2])
                pieces.append(s[i + 2 ..< i + token.count - 2])
                pieces.append(s[i + token.count - 2 ..< i + token.count])
                i += token.count
            } else if c == "'", let length = contractionLength(s, at: i) {
                pieces.append(s[i ..< i + length])
                i += length
            } else if isLetter(c) {
                var j = i + 1
                while j < s.count && isLetter(s[j]) { j += 1 }
                pieces.append(s[i ..< j])
                i = j
            } else if isNumber(c) {
                pieces.append(s[i ..< i + 1])
                i += 1
            } else if !isWhitespace(c) {
                var j = i + 1
                while j < s.count && !isLetter(s[j]) && !isNumber(s[j]) && !isWhitespace(s[j]) { j += 1 }
                pieces.append(s[i ..< j])
                i = j
            } else {
                i += 1
            }
        }
        return pieces
    }

    /// Steps 4–5 for one piece: byte symbols, merges, ids. Cached per piece.
    func bpe(_ piece: ArraySlice<Unicode.Scalar>) -> [Int32] {
        // Keyed by UTF-8 bytes: String equality is canonical equivalence, which would merge distinct pieces.
        var bytes: [UInt8] = []
        bytes.reserveCapacity(piece.count * 2)
        for scalar in piece { UTF8.encode(scalar) { bytes.append($0) } }
        cacheLock.lock()
        let cached = cache[bytes]
        cacheLock.unlock()
        if let cached { return cached }

        var symbols = bytes.map { byteIDs[Int($0)] }
        symbols[symbols.count - 1] = byteEndIDs[Int(bytes[bytes.count - 1])]
        while symbols.count > 1 {
            // The adjacent pair with the lowest rank...
            var best: (rank: Int32, merged: Int32, left: Int32, right: Int32)? = nil
            for k in 0 ..< symbols.count - 1 {
                if let merge = merges[UInt64(UInt32(symbols[k])) << 32 | UInt64(UInt32(symbols[k + 1]))],
                   best == nil || merge.rank < best!.rank {
                    best = (merge.rank, merge.merged, symbols[k], symbols[k + 1])
                }
            }
            guard let best else { break }
            // ...merged wherever it occurs, left to right.
            var merged: [Int32] = []
            merged.reserveCapacity(symbols.count)
            var k = 0
            while k < symbols.count {
                if k + 1 < symbols.count && symbols[k] == best.left && symbols[k + 1] == best.right {
                    merged.append(best.merged)
                    k += 2
                } else {
                    merged.append(symbols[k])
                    k += 1
                }
            }
            symbols = merged
        }

        cacheLock.lock()
        if cache.count < Self.cacheLimit { cache[bytes] = symbols }
        cacheLock.unlock()
        return symbols
    }
}

private let specialStart = Array(CLIPTokenizer.startOfText.unicodeScalars)
private let specialEnd = Array(CLIPTokenizer.endOfText.unicodeScalars)

private func hasPrefix(_ s: [Unicode.Scalar], _ token: [Unicode.Scalar], at i: Int) -> Bool {
    guard i + token.count <= s.count else { return false }
    for k in 0 ..< token.count where s[i + k] != token[k] { return false }
    return true
}

/// Length of `'s|'t|'re|'ve|'m|'ll|'d` at `i` (s[i] is "'"), nil if none.
private func contractionLength(_ s: [Unicode.Scalar], at i: Int) -> Int? {
    guard i + 1 < s.count else { return nil }
    switch s[i + 1] {
    case "s", "t", "m", "d": return 2
    case "r", "v":
        return i + 2 < s.count && s[i + 2] == "e" ? 3 : nil
    case "l":
        return i + 2 < s.count && s[i + 2] == "l" ? 3 : nil
    default: return nil
    }
}

/// \s: the White_Space property.
@inline(__always)
private func isWhitespace(_ c: Unicode.Scalar) -> Bool {
    if c.value < 0x80 { return c.value == 0x20 || (c.value >= 0x09 && c.value <= 0x0D) }
    return c.properties.isWhitespace
}

/// \p{L}: Lu, Ll, Lt, Lm, Lo.
@inline(__always)
private func isLetter(_ c: Unicode.Scalar) -> Bool {
    if c.value < 0x80 { return (c.value | 0x20) >= 0x61 && (c.value | 0x20) <= 0x7A }
    switch c.properties.generalCategory {
    case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
    default: return false
    }
}

/// \p{N}: Nd, Nl, No.
@inline(__always)
private func isNumber(_ c: Unicode.Scalar) -> Bool {
    if c.value < 0x80 { return c.value >= 0x30 && c.value <= 0x39 }
    switch c.properties.generalCategory {
    case .decimalNumber, .letterNumber, .otherNumber: return true
    default: return false
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 bytes map to
/// U+0100 onwards in byte order.
let byteSymbols: [Character] = {
    var symbols = [Character](repeating: " ", count: 256)
    var next: UInt32 = 256
    for byte in 0..<256 {
        let printable = (33...126).contains(byte) || (161...172).contains(byte) || (174...255).contains(byte)
        if printable {
            symbols[byte] = Character(Unicode.Scalar(UInt32(byte))!)
        } else {
            symbols[byte] = Character(Unicode.Scalar(next)!)
            next += 1
        }
    }
    return symbols
}()

import NIOCore

/// One frame off the wire: its type byte, request ID and body (not yet parsed).
public struct Frame: Hashable, Sendable {
    public var type: UInt8
    public var requestID: UInt32
    public var body: ByteBuffer
    public init(type: UInt8, requestID: UInt32, body: ByteBuffer) {
        self.type = type
        self.requestID = requestID
        self.body = body
    }
}

/// Cuts a byte stream into frames. Bytes may arrive in any pieces; an oversized
/// length is refused as soon as its 4 bytes are in, before any body is buffered.
public struct FrameDecoder: Sendable {
    /// The largest `length` accepted; the connection raises it after the handshake.
    public var maxFrameLength: Int
    private var buffer: ByteBuffer

    public init(maxFrameLength: Int = ProtocolConstants.defaultMaxFrameLength) {
        self.maxFrameLength = maxFrameLength
        buffer = ByteBufferAllocator().buffer(capacity: 0)
    }

    public mutating func append(_ bytes: ByteBuffer) {
        var bytes = bytes
        if buffer.readableBytes == 0 {
            buffer = bytes  // the common case: no copy
        } else {
            buffer.writeBuffer(&bytes)
        }
    }

    /// Bytes received that do not yet make a whole frame.
    public var bufferedBytes: Int { buffer.readableBytes }

    /// The next whole frame, or nil if more bytes are needed.
    public mutating func next() throws -> Frame? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, endianness: .big, as: UInt32.self) else { return nil }
        guard length >= UInt32(ProtocolConstants.frameHeaderLength) else {
            throw ProtocolError(.invalidRequest, "malformed frame: length \(length) is shorter than a frame header")
        }
        guard UInt64(length) <= UInt64(maxFrameLength) else {
            throw ProtocolError(.frameTooLarge, "frame of \(length) bytes exceeds the maximum of \(maxFrameLength)")
        }
        guard buffer.readableBytes >= 4 + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: 4)
        let type: UInt8 = buffer.readInteger()!
        let id: UInt32 = buffer.readInteger(endianness: .big)!
        let body = buffer.readSlice(length: Int(length) - ProtocolConstants.frameHeaderLength)!
        if buffer.readableBytes == 0 { buffer.clear() } else if buffer.readerIndex > 1 << 20 { buffer.discardReadBytes() }
        return Frame(type: type, requestID: id, body: body)
    }
}

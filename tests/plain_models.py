"""Test-only: the plain hand-written models that models/ replaces, as people wrote them.

Same class names, constructor arguments and parameter names as models/, and the plain math with its
flaws kept: no causal mask on the decoder (EfficientInstructionLLM puts one on the encoder), no
positional information, and EnhancedEncoderDecoder's sequence-first attention fed batch-first tensors.
Their state_dicts must load into models/ with strict=True.
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderDecoder(nn.Module):
    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.encoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.decoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.fc_out = nn.Linear(hidden_size, vocab_size)

    def forward(self, src, tgt):
        _, (hidden, cell) = self.encoder(self.embedding(src))
        dec_output, _ = self.decoder(self.embedding(tgt), (hidden, cell))
        return self.fc_out(dec_output)


class AttentionLayer(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden_size, num_heads=8)

    def forward(self, query, key, value):
        return self.attention(query, key, value)[0]


class EnhancedEncoderDecoder(nn.Module):
    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.encoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.decoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.attention = AttentionLayer(hidden_size)
        self.fc_out = nn.Linear(hidden_size, vocab_size)

    def forward(self, src, tgt):
        enc_output, (hidden, cell) = self.encoder(self.embedding(src))
        dec_output, _ = self.decoder(self.embedding(tgt), (hidden, cell))
        return self.fc_out(self.attention(dec_output, enc_output, enc_output))  # batch-first into seq-first


class InstructionLLM(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, num_encoder_layers, num_decoder_layers):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.transformer = nn.Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers)
        self.fc_out = nn.Linear(d_model, vocab_size)

    def forward(self, src, tgt):
        return self.fc_out(self.transformer(self.embedding(src), self.embedding(tgt)))


class HybridModel(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, num_encoder_layers, num_decoder_layers):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, nhead), num_encoder_layers)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d_model, nhead), num_decoder_layers)
        self.fc_out = nn.Linear(d_model, vocab_size)

    def forward(self, src, tgt):
        memory = self.encoder(self.embedding(src))
        return self.fc_out(self.decoder(self.embedding(tgt), memory))


class EfficientInstructionLLM(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, num_layers):
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.transformer = nn.Transformer(d_model, nhead, num_layers, num_layers, dim_feedforward=d_model * 4,
                                          dropout=0.1)
        self.fc_out = nn.Linear(d_model, vocab_size)

    def forward(self, src, tgt):
        src_embed = self.embedding(src) * (self.d_model ** 0.5)
        tgt_embed = self.embedding(tgt) * (self.d_model ** 0.5)
        src_mask = self.generate_square_subsequent_mask(src.size(0))
        tgt_mask = self.generate_square_subsequent_mask(tgt.size(0))
        return self.fc_out(self.transformer(src_embed, tgt_embed, src_mask=src_mask, tgt_mask=tgt_mask))

    def generate_square_subsequent_mask(self, sz):
        mask = (torch.triu(torch.ones(sz, sz)) == 1).transpose(0, 1)
        return mask.float().masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0)


class SimpleDecoderOnly(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, num_layers):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.transformer = nn.TransformerDecoder(nn.TransformerDecoderLayer(d_model, nhead), num_layers)
        self.fc_out = nn.Linear(d_model, vocab_size)

    def forward(self, x):
        x = self.embedding(x)
        x = self.transformer(x, x)  # its input as its own memory, no mask
        return self.fc_out(x)


class DecoderOnly(nn.Module):
    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.transformer = nn.TransformerDecoder(nn.TransformerDecoderLayer(hidden_size, nhead=8), num_layers=6)
        self.fc_out = nn.Linear(hidden_size, vocab_size)

    def forward(self, x):
        x = self.embedding(x)
        x = self.transformer(x, x)
        return self.fc_out(x)


class SimpleEncoderDecoder(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.encoder = nn.LSTM(input_dim, hidden_dim, batch_first=True)
        self.decoder = nn.LSTM(hidden_dim, hidden_dim, batch_first=True)
        self.fc_out = nn.Linear(hidden_dim, output_dim)

    def forward(self, src, trg):
        enc_output, (hidden, cell) = self.encoder(src)
        dec_output, _ = self.decoder(trg, (hidden, cell))
        return self.fc_out(dec_output)
